DROP TABLE inventories; DROP TABLE commands; DROP TABLE agents;
