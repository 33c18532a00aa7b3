"""The DoReFa-Net toolkit's helper package: everything the top-level scripts share.

* :mod:`dorefanet.tf_setup`: TensorFlow prepared for tensorpack (import it first);
* :mod:`dorefanet.cli`: the shared command line (``--dorefa W,A,G`` and the common flags);
* :mod:`dorefanet.network`: the one description of a network, built as a TensorFlow graph or a packed program;
* :mod:`dorefanet.layer_bits`: ``--layer-bits``, each layer's (W, A, G) resolved against that description;
* :mod:`dorefanet.driver`: train / ``--eval`` / ``--run`` / ``--export`` dispatch shared by the scripts;
* :mod:`dorefanet.training`: run directories, resuming, trainers;
* :mod:`dorefanet.checkpoints`: reading, strictly checking and writing model weights;
* :mod:`dorefanet.inference`: predictors, evaluation, single-image runs;
* :mod:`dorefanet.svhn_data`, :mod:`dorefanet.image_io`, :mod:`dorefanet.atomic_file`,
  :mod:`dorefanet.synthetic_weights`, :mod:`dorefanet.scripts`;
* :mod:`dorefanet.packed`: bit-packed models and their inference engine (no TensorFlow needed).

Importing the package itself imports nothing heavy.
"""
