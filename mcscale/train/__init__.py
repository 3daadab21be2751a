"""The stages: BYOL pre-training, clustering, evaluation; one step loop and one run-folder module."""
