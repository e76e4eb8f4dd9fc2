//! Prints the built-in default policy as YAML: the reference block in the README is this output,
//! and a test keeps the two identical.
fn main() {
    match serde_saphyr::to_string(&automigrate_core::Policy::default()) {
        Ok(text) => print!("{text}"),
        Err(error) => eprintln!("{error}"),
    }
}
