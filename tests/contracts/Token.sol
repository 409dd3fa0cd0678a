// SPDX-License-Identifier: MIT
pragma solidity ^0.8.20;

// Emits logs for the Ethereum source's tests (compiled by solcjs at test time).
contract Token {
    event Transfer(address indexed from, address indexed to, uint256 value);
    event Note(string text, uint256[] values);

    function emitMany(uint256 n, uint256 start) external {
        for (uint256 i = 0; i < n; i++) {
            emit Transfer(msg.sender, address(uint160(i + 1)), start + i);
        }
    }

    function note(string calldata text, uint256[] calldata values) external {
        emit Note(text, values);
    }
}
