"""Model surgery: trace a model, find rewrite sites (a pure Plan), apply a Plan, verify the result."""
