"""``folovllm bench ...``: measurements that end up in ``milestones/results``."""
