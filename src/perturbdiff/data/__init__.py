"""perturbdiff.data"""
