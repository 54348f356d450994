"""DVC entry points, one per stage: ``python -m stages.<name>`` runs ``cxrgen <name>``.

They run as modules (``-m``) because a script named ``tokenize.py`` run by path would
shadow Python's own ``tokenize`` module.
"""
