"""homefire: self-hosted, resumable fine-tuning recipes on a Tinker-shaped local client API.

Layers (arrows point down only):

- ``training.recipes``: one readable loop per method (``sft_loop``, ...).
- ``training.utils``: what recipes share: ``InfraConfig``, ``TrainingCheckpoints``, data rendering,
  metrics and progress.
- ``training.sdk``: the local stand-in for the hosted training service (types, service/training
  clients, checkpoint store, model registry).
"""

__version__ = "0.1.0"
