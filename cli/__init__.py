"""The bnfold command line (installed as the ``bnfold.cli`` package)."""
