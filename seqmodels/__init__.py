"""The sequence models shared by `training` and `service`: networks (`seqmodels.networks`) and
their self-contained, hash-checked artifact format (`seqmodels.artifacts`)."""
