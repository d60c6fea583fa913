"""CRIU itself: its RPC and its image formats."""
