"""``python -m itpn_d2.data``: make the toy dataset (the same command as ``itpn-make-toy``)."""

import sys

from .toy import cli

sys.exit(cli())
