"""The DoReFa-Net toolkit's helper package: everything the top-level scripts share.

A script is a network, a recipe and a data source; the package does the rest:

* :mod:`dorefanet.model`: a script's three parts at one set of bit widths (no TensorFlow);
  :mod:`dorefanet.tf_model`: its TensorFlow graph and optimizer (a tensorpack ``ModelDesc``);
* :mod:`dorefanet.builder`: the words a network is described with, and the builders' shared base;
  :mod:`dorefanet.network` builds a description in TensorFlow, :mod:`dorefanet.packed.program` as a
  packed program;
* :mod:`dorefanet.bits`: bit widths (``--dorefa W,A,G``) and their per-layer table (``--layer-bits``);
* :mod:`dorefanet.cli`: the one command line; :mod:`dorefanet.driver`: the one dispatch of its modes;
* data sources: :mod:`dorefanet.svhn_data`, :mod:`dorefanet.cifar_data` (both in-memory sets,
  :mod:`dorefanet.image_arrays`), :mod:`dorefanet.imagenet` with :mod:`dorefanet.imagenet_data` (and the
  top-level ``imagenet_utils`` for ImageNet's training dataflows); :mod:`dorefanet.seeded_batches`: the
  training batches as a function of ``--seed``;
* :mod:`dorefanet.training`, :mod:`dorefanet.distributed`, :mod:`dorefanet.cluster`,
  :mod:`dorefanet.logdir_lock`: run directories, resuming, trainers, several machines;
* :mod:`dorefanet.checkpoints`, :mod:`dorefanet.inference`, :mod:`dorefanet.summary`,
  :mod:`dorefanet.sweep`: weights, predictors and evaluation, per-layer costs, sweeps;
* :mod:`dorefanet.packed`: bit-packed models and their inference engine (no TensorFlow needed).

Importing the package itself imports nothing heavy.
"""
