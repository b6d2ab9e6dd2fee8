"""Scoring shared by Stage III's rewards (:mod:`parauni.rl`) and the benchmarks (:mod:`parauni.eval`): the
CLIP embedder (:mod:`.clip`) and GenEval's rules (:mod:`.geneval_rules`). It depends on nothing above
:mod:`parauni.utils`, so both packages use it without depending on each other."""
