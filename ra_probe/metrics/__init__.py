"""The metrics stage, on plain tensors and dicts (no model, no engine):

ra.py       Residual Alignment: trajectory linearity (RA1), alignment of singular vectors (RA2), ranks
            (RA3), σ₁ across depth (RA4)
nc.py       Neural Collapse NC1–NC4 on the classifier's input features, classes with enough samples only
verdict.py  present / partial / absent / not applicable, with the evidence and the contrast with random init"""
