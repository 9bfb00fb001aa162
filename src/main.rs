fn main() {
    println!("ptxgrad {}", ptxgrad::ptx::COMPILER);
}
