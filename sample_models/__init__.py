"""Sample models for bnfold: architectures, a deterministic build script, trained files and test sets."""
