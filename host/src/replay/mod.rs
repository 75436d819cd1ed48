//! Running history again: dead letters through a plugin once more, and a
//! candidate version over past events with no effects.

pub mod candidate;
pub mod dead_letters;
