"""The gRPC messages and stubs fastca speaks, generated from proto/ by
dev/gen-proto and kept in the tree. A neutral package: the server and the
node agent both import it, neither imports the other."""
