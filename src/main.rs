fn main() -> anyhow::Result<()> {
    let cfg = ftrun::config::load(std::path::Path::new(&std::env::args().nth(1).unwrap()), &[])?;
    println!("{cfg:#?}");
    Ok(())
}
