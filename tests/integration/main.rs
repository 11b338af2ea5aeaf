//! Errand's integration tests, built into one test binary.
//!
//! They use the real models from the catalog: SmolLM2 for engine mechanics,
//! Qwen2.5-Coder where tool calling matters. `scripts/test.sh` fetches them
//! first; run by hand, a missing model fails with the fetch command to run.

mod util;

mod chaos;
mod clock;

mod memory;

mod agent_qwen;
mod e2e_qwen;
mod eval;
mod fuzz;
mod load;
mod payments;
mod regression;
mod server_clients;
mod server_qwen;
mod server_ws;
mod slow_clients;
mod e2e_smollm;
mod fetch_script;
mod grammar;
mod reference_model;
mod template_golden;
mod tokenizer_fixture;
mod vector_store;
