//! Rebuilds the crate when a migration file changes: `sqlx::migrate!` embeds the files at
//! compile time but does not tell Cargo to watch them (the pattern sqlx documents).
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
