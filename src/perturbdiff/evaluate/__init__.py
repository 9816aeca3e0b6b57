"""perturbdiff.evaluate"""
