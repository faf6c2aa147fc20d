"""Out-of-distribution detection: PALM training (``ood train``), scores of any checkpoint's features
(``ood score``) and their evaluation (``ood eval``). The metrics live in :mod:`pyprotoclip.eval.ood_metrics`."""
