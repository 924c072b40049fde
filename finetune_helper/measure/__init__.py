"""Measure: torch-side tools that count what training really holds (tests and benchmarks use them to check the
estimate against real tensors).  Not imported by the recommender, the runner or the app."""
