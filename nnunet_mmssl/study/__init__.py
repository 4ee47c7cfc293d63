"""Label-efficiency study: Dice at N labelled cases, SSL vs supervised (``nnUNetv2_mmssl_study``).

:mod:`.splits` (which cases each run labels, hides and tests on), :mod:`.bootstrap` (paired bootstrap interval),
:mod:`.runner` (nnU-Net's commands per run, resumable), :mod:`.report` (table, paired differences, plot, JSON).
"""
