//! nio-executor: applies jobs from NATS JetStream to machines over SSH.
fn main() -> anyhow::Result<()> {
    anyhow::bail!("nio-executor is not implemented yet (issue #5)")
}
