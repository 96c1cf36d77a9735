"""Masks: the global selection, the criterion variants, the NNI pruners and masked training."""
