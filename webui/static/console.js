"use strict";
// Minimal console bootstrap: shows who this node is. Text goes in with
// textContent only, so nothing from the network is ever parsed as HTML.
(function () {
  const $ = (id) => document.getElementById(id);
  async function refresh() {
    try {
      const response = await fetch("/health", { cache: "no-store" });
      const health = await response.json();
      $("realm-name").textContent = health.realm_name;
      $("realm-id").textContent = health.realm;
      $("peer-id").textContent = health.peer_id;
      $("address").textContent = health.address;
      $("uptime").textContent = Math.round(health.uptime_s) + " s";
      $("connection").textContent = "connected";
      $("connection").className = "status ok";
    } catch (err) {
      $("connection").textContent = "reconnecting…";
      $("connection").className = "status";
    }
  }
  refresh();
  setInterval(refresh, 5000);
})();
