#Requires -Version 5.1
<#
.SYNOPSIS
    Hot-removes network adapters from a running hvnet VM.

.DESCRIPTION
    Removes the named network adapters with Remove-VMNetworkAdapter. Hyper-V removes
    adapters from a running VM only for Generation 2 VMs (Windows Server 2016 /
    Windows 10 hosts and later); a Generation 1 VM must be off, and the script refuses
    otherwise. The appliance sees each adapter's VMBus channel rescinded and takes the
    interface down.

    Names must match exactly (no wildcards). Hyper-V allows two adapters with the same
    name; the script removes every adapter with a given name and says so.

.PARAMETER VMName
    The VM (as shown by Get-VM).

.PARAMETER Name
    Names of the adapters to remove (Get-VMNetworkAdapter -VMName <VM> lists them).

.PARAMETER WaitSeconds
    After removing, wait up to this many seconds, 0 to 600, for Hyper-V to stop listing
    the adapters. Default 30.

.EXAMPLE
    .\Remove-HvnetNic.ps1 -VMName hvnet1 -Name nic2, nic3

.EXAMPLE
    .\Remove-HvnetNic.ps1 -VMName hvnet1 -Name nic1 -WhatIf

.OUTPUTS
    None.
#>
[CmdletBinding(SupportsShouldProcess, ConfirmImpact = 'Medium')]
param(
    [Parameter(Mandatory)]
    [ValidateNotNullOrEmpty()]
    [string] $VMName,

    [Parameter(Mandatory)]
    [ValidateCount(1, 12)]
    [ValidateNotNullOrEmpty()]
    [string[]] $Name,

    [ValidateRange(0, 600)]
    [int] $WaitSeconds = 30
)

Set-StrictMode -Version Latest
$ErrorActionPreference = 'Stop'

if (-not (Get-Command -Name 'Remove-VMNetworkAdapter' -ErrorAction SilentlyContinue)) {
    throw 'The Hyper-V PowerShell module is not available (enable Hyper-V with its management tools).'
}
$vm = Get-VM -Name $VMName -ErrorAction SilentlyContinue
if ($null -eq $vm) {
    throw "There is no VM named '$VMName' (Get-VM lists them)."
}
if (@($vm).Count -ne 1) {
    throw "More than one VM is named '$VMName'."
}
if ($vm.Generation -eq 1 -and $vm.State -ne 'Off') {
    throw ("'$VMName' is a Generation 1 VM in state $($vm.State): Hyper-V hot-removes network adapters only " +
        'from Generation 2 VMs. Stop it first (Stop-VM), or use a Generation 2 VM for hot-plug.')
}

$current = @(Get-VMNetworkAdapter -VM $vm)
$plan = @()
foreach ($adapterName in $Name) {
    $matching = @($current | Where-Object { $_.Name -eq $adapterName })
    if ($matching.Count -eq 0) {
        $known = ($current | ForEach-Object { $_.Name }) -join ', '
        throw "'$VMName' has no adapter named '$adapterName' (it has: $known)."
    }
    if ($matching.Count -gt 1) {
        Write-Warning "'$VMName' has $($matching.Count) adapters named '$adapterName'; removing all of them."
    }
    $plan += , @($adapterName, $matching)
}

$removed = @()
foreach ($entry in $plan) {
    $adapterName = $entry[0]
    if ($PSCmdlet.ShouldProcess($VMName, "Remove network adapter '$adapterName'")) {
        $entry[1] | Remove-VMNetworkAdapter -Confirm:$false
        $removed += $adapterName
        Write-Verbose "removed '$adapterName' from '$VMName'"
    }
}

if ($removed.Count -gt 0 -and $WaitSeconds -gt 0) {
    $clock = [Diagnostics.Stopwatch]::StartNew()
    do {
        $left = @(Get-VMNetworkAdapter -VM $vm | Where-Object { $removed -contains $_.Name })
        if ($left.Count -eq 0) { break }
        Start-Sleep -Milliseconds 250
    } while ($clock.Elapsed.TotalSeconds -lt $WaitSeconds)
    if ($left.Count -gt 0) {
        Write-Warning "Hyper-V still lists $($left.Count) of the removed adapters after $WaitSeconds s."
    }
    else {
        Write-Host ("Removed {0} from '{1}' in {2:N1} s." -f ($removed -join ', '), $VMName, $clock.Elapsed.TotalSeconds)
    }
}
