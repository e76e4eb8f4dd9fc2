//! Prints the Migration CRD as YAML: `cargo run -p automigrate-operator --bin crdgen > deploy/crd.yaml`.

fn main() -> anyhow::Result<()> {
    print!("{}", automigrate_operator::crd::crd_yaml()?);
    Ok(())
}
