"""The lowest room: typed data every other room shares (tasks, the user-error base class).

It imports nothing of the project, so store, tools, miniatures, agents, graphs, finetune, evals and
the shell can all use it.
"""
