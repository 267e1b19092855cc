#!/usr/bin/env python
"""Train class-assignment heads (SeLa, Self-Classifier, EmbedUL), from scratch or from a pre-trained run.

    python main_cluster.py --config configs/sela_cifar10_resnet.yaml
    python main_cluster.py --config configs/embedul_cifar10.yaml --pretrained runs/superand_cifar10

The program lives in src/clusterlab/programs/train.py; its heads are scored by `eval_cluster.py --run RUN`.
"""
if __name__ == "__main__":
    from clusterlab import signals

    signals.install()  # first: from here on a pre-emption signal requeues (Python's default kills at once)
    from clusterlab.programs import run

    run("main_cluster.py")
