//! Baselines that the criterion benchmarks in `benches/` measure the engine against.
