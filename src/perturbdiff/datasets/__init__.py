"""perturbdiff.datasets"""
