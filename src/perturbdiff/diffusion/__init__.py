"""perturbdiff.diffusion"""
