"""g2a-bridge: dropship CodesWholesale stock on the G2A marketplace."""
__version__ = "0.1.0"
