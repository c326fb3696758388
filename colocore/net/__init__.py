"""The host side of guest networking: the tap backend (tap.py: /dev/net/tun, pyroute2
plumbing) and announcements after a guest moved (announce.py)."""
