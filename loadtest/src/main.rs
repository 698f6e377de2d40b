//! nio-loadtest: Kubernetes API simulator, fleet simulator and load test.
fn main() -> anyhow::Result<()> {
    anyhow::bail!("nio-loadtest is not implemented yet (issues #3, #6)")
}
