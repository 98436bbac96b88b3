//! `hotroll check FILE`: placeholder until the plan compiler lands.
