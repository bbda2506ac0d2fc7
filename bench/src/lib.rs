//! What `forkd-bench` and `forkd-bench-engines` share.

mod rng;

pub use rng::Rng;
