//! The `kvmesh` command.
fn main() {
    println!("kvmesh");
}
