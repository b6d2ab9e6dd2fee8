"""Analyses of a trained model (paper section 3.1, figures 2, 4 and 5): see :mod:`parauni.analysis.layers`."""
