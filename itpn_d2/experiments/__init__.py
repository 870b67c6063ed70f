"""Experiments built from this project's command lines: the end-to-end toy demo
(:mod:`.demo`, ``tools/demo.py``) and the transfer study (:mod:`.transfer_study`,
``tools/transfer_study.py``), both made of cached stages (:mod:`.stages`) that run the
checkout's tools as subprocesses and read the files those write. They work from a checkout
only (``Runner`` says so in one line elsewhere). Imports no detectron2.
"""
