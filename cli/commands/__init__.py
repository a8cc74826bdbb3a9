"""The ``bnfold`` commands, one module each; ``bnfold.cli.main`` registers them."""
