"""A hospital site: the Flower ClientApp, its client, its policy and the SecAgg+ gate."""
