//! The library side of the `clientele` command-line tool: the synthetic data generator and
//! the importer, shared by the binary and the end-to-end tests.

pub mod event_json;
pub mod generate;
pub mod import;
pub mod money;
