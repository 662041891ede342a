//! Counter-style random streams: every random decision (shuffle, shift, dropout mask) draws
//! from a generator seeded by what it is for (run seed, epoch, step, layer, sample), never from
//! a shared sequential generator. Runs are reproducible, and a decision does not depend on how
//! work is split across threads or on what was drawn before it (what resume needs).

use rand_xoshiro::Xoshiro256PlusPlus;
use rand_xoshiro::rand_core::SeedableRng;

/// Mix several words (seed, step, layer, ...) into one stream id.
pub fn stream_id(words: &[u64]) -> u64 {
    words.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &w| (h ^ w).wrapping_mul(0x0000_0100_0000_01B3).rotate_left(29))
}

/// The generator for item `index` (a sample, say) of `stream`.
pub fn substream(stream: u64, index: u64) -> Xoshiro256PlusPlus {
    Xoshiro256PlusPlus::seed_from_u64(stream ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(17))
}
