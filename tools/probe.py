#!/usr/bin/env python
"""Linear probes of a frozen iTPN (:mod:`itpn_d2.probe`): object, dense and image protocols,
beside raw pixels and a random model, with 95% intervals.

    python tools/probe.py output/demo/pretrain/backbone.pth --output output/probe

The same command as ``itpn-probe``.
"""

import sys

from itpn_d2.probe import cli as main

if __name__ == "__main__":
    sys.exit(main())
