"""clusterlab: self-supervised and unsupervised image classification methods under one protocol, made for Slurm."""
__version__ = "0.1.0"
