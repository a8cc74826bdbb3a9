"""Running bnfold models on Ray (the `bnfold[ray]` extra): shared cluster helpers and Ray Serve."""
