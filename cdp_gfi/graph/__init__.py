"""The model as a graph: fx trace, channel steps, coupled channel groups, scopes, feature sites."""
